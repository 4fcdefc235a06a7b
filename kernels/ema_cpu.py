"""CPU kernels (numba, parallel over chunks, serial twins for small work).

Every kernel walks a group of source tensors through the tables of
:mod:`fastema.kernels.layout`; a flat source is a group of one segment.

Shared arguments (arrays 1-D, C-contiguous):
    n:           elements per shadow row (the row stride).
    shadow_addr: int64[S] address of each segment's shadow (row 0); row k lies
                 ``k * n`` elements further. Elements are float32, bfloat16 or
                 float16 bits (uint32/uint16); written in place. A flat shadow gives
                 ``base + seg_offset[s] * itemsize``; a scattered one (another model's
                 tensors) gives each tensor's own address, with K = 1.
    seg_addr:    int64[S] address of each source tensor's first element.
    seg_offset:  int64[S + 1] where each source starts in a shadow row.
    chunk_seg:   int32[C] segment of each chunk.
    chunk_begin: int64[C + 1] chunk boundaries within a shadow row.

Kernels are built per (storage kinds, mode, parallel) by the ``*_kernel``
factories below; the kinds are closure constants, so the branches fold away.
Each kernel is a loop over chunks (``prange`` in the parallel twin) calling a
separately compiled per-chunk function whose loop indexes raw pointers from 0:
LLVM vectorises that form, and keeps it vectorised inside numba's parallel
region (a loop written inline in the ``prange`` body lost vectorisation there
and ran no faster on two threads than on one).
"""
import functools

import numpy as np
from numba import njit, prange

from . import _bits, _smooth
from ._bits import F32, F64, ITEMSIZE
from ._cpu_hw import as_bits, as_float, f64_pointer, u16_pointer, u32_pointer

EXCHANGE, PACK, UNPACK = 0, 1, 2      # swap modes, see _bits.pack_bf16

_scalar = functools.partial(njit, inline="always", cache=True)
decode = _scalar(_bits.decode)
encode = _scalar(_bits.encode)
encode_bf16_sr = _scalar(_bits.encode_bf16_sr)
sr_noise = _scalar(_bits.sr_noise)
pack_bf16 = _scalar(_bits.pack_bf16)
unpack_bf16 = _scalar(_bits.unpack_bf16)
is_nonfinite = _scalar(_bits.is_nonfinite)
neumaier = _scalar(_smooth.neumaier)


def _pointer(kind):
    """(pointer intrinsic, bytes per element) for a storage kind."""
    return {F32: u32_pointer, F64: f64_pointer}.get(kind, u16_pointer), ITEMSIZE[kind]


def wide(*kinds) -> bool:
    """True when a kernel over these storage kinds computes in float64 (any of them is float64)."""
    return F64 in kinds


@functools.cache
def _access(kind):
    """``(load, store)`` of one element of storage ``kind`` as a float64 value (the wide path).

    float64 is read and written as is; narrower kinds are widened exactly on load and
    rounded to nearest even on store (through float32, as every kernel rounds).
    """
    K = kind
    if kind == F64:
        def load(p, j):
            return p[j]

        def store(p, j, v):
            p[j] = v
    else:
        def load(p, j):
            return np.float64(as_float(decode(p[j], K)))

        def store(p, j, v):
            p[j] = encode(as_bits(np.float32(v)), K)
    return _scalar(load), _scalar(store)


def _compile(fn, parallel):
    return njit(parallel=parallel, fastmath={"contract"}, cache=True)(fn)


def _chunk(fn):
    return njit(fastmath={"contract"}, cache=True)(fn)


@functools.cache
def lerp_kernel(shadow_kind, src_kind, stochastic, parallel):
    """``shadow[k] <- shadow[k] + w[k] * (src - shadow[k])`` for every row k, in float32.

    The same two-sided formula as ``torch.lerp`` (``|w| < 0.5``: from the shadow,
    else from the source) with one FMA, so float32 results equal ``torch.lerp_``.

    Extra arguments:
        weights: float32[K] array or tuple, ``w = 1 - decay`` per row (float64 for a
                 float64 kernel, which also widens a float32 array's values).
        flag:    int32[>=1]; when ``flag[0] != 0`` nothing is written (non-finite guard).
        key:     uint32 stochastic-rounding key (ignored unless ``stochastic``).
    """
    sptr, SB = _pointer(shadow_kind)
    xptr, XB = _pointer(src_kind)
    SK, XK, SR = shadow_kind, src_kind, stochastic

    @_chunk
    def chunk(q_addr, p_addr, m, w, first, key):
        q = sptr(q_addr, m)
        p = xptr(p_addr, m)
        small = abs(w) < np.float32(0.5)
        coeff = w if small else w - np.float32(1.0)
        for j in range(m):
            e = as_float(decode(q[j], SK))
            x = as_float(decode(p[j], XK))
            y = as_bits((e if small else x) + coeff * (x - e))
            if SR:
                q[j] = encode_bf16_sr(y, sr_noise(key, first + j))
            else:
                q[j] = encode(y, SK)

    if wide(SK, XK):                                   # float64 on either side: compute in float64
        sload, sstore = _access(SK)
        xload, _ = _access(XK)

        @_chunk
        def chunk(q_addr, p_addr, m, w, first, key):  # noqa: F811
            q = sptr(q_addr, m)
            p = xptr(p_addr, m)
            w = np.float64(w)
            small = abs(w) < 0.5
            coeff = w if small else w - 1.0
            for j in range(m):
                e = sload(q, j)
                x = xload(p, j)
                sstore(q, j, (e if small else x) + coeff * (x - e))

    def kernel(n, shadow_addr, seg_addr, seg_offset, chunk_seg, chunk_begin, weights, flag, key):
        if flag[0] != 0:
            return
        for c in prange(chunk_seg.size):
            s = chunk_seg[c]
            begin = chunk_begin[c]
            m = chunk_begin[c + 1] - begin
            within = begin - seg_offset[s]
            p_addr = seg_addr[s] + within * XB
            for k in range(len(weights)):          # rows after the first re-read the chunk from cache
                first = k * n + begin              # the noise index: position in the (K, n) layout
                chunk(shadow_addr[s] + (k * n + within) * SB, p_addr, m, weights[k], first, key)

    return _compile(kernel, parallel)


@functools.cache
def copy_kernel(shadow_kind, src_kind, to_shadow, parallel):
    """Copy with conversion (round to nearest even) between the sources and shadow rows.

    ``to_shadow``: every row in ``[row_lo, row_hi)`` receives the sources; else the
    sources receive row ``row_lo`` (``row_hi`` unused). Same kinds copy bits exactly.
    Nothing is written when ``flag[0] != 0`` (int32[>=1], the non-finite guard).
    """
    sptr, SB = _pointer(shadow_kind)
    xptr, XB = _pointer(src_kind)
    SK, XK, TO = shadow_kind, src_kind, to_shadow
    SAME = shadow_kind == src_kind

    @_chunk
    def chunk(q_addr, p_addr, m):
        q = sptr(q_addr, m)
        p = xptr(p_addr, m)
        for j in range(m):
            if TO:
                q[j] = p[j] if SAME else encode(decode(p[j], XK), SK)
            else:
                p[j] = q[j] if SAME else encode(decode(q[j], SK), XK)

    if wide(SK, XK) and not SAME:
        sload, sstore = _access(SK)
        xload, xstore = _access(XK)

        @_chunk
        def chunk(q_addr, p_addr, m):  # noqa: F811
            q = sptr(q_addr, m)
            p = xptr(p_addr, m)
            for j in range(m):
                if TO:
                    sstore(q, j, xload(p, j))
                else:
                    xstore(p, j, sload(q, j))

    def kernel(n, shadow_addr, seg_addr, seg_offset, chunk_seg, chunk_begin, row_lo, row_hi, flag):
        if flag[0] != 0:
            return
        last = row_hi if TO else row_lo + 1
        for c in prange(chunk_seg.size):
            s = chunk_seg[c]
            begin = chunk_begin[c]
            m = chunk_begin[c + 1] - begin
            within = begin - seg_offset[s]
            p_addr = seg_addr[s] + within * XB
            for k in range(row_lo, last):
                chunk(shadow_addr[s] + (k * n + within) * SB, p_addr, m)

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

    @_chunk
    def chunk(q_addr, p_addr, m):
        q = sptr(q_addr, m)
        p = xptr(p_addr, m)
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

    if wide(SK, XK):                                   # EXCHANGE only: exact when both are float64
        sload, sstore = _access(SK)
        xload, xstore = _access(XK)

        @_chunk
        def chunk(q_addr, p_addr, m):  # noqa: F811
            q = sptr(q_addr, m)
            p = xptr(p_addr, m)
            for j in range(m):
                a = sload(q, j)
                b = xload(p, j)
                sstore(q, j, b)
                xstore(p, j, a)

    def kernel(n, shadow_addr, seg_addr, seg_offset, chunk_seg, chunk_begin, row):
        for c in prange(chunk_seg.size):
            s = chunk_seg[c]
            begin = chunk_begin[c]
            within = begin - seg_offset[s]
            chunk(shadow_addr[s] + (row * n + within) * SB, seg_addr[s] + within * XB, chunk_begin[c + 1] - begin)

    return _compile(kernel, parallel)


@functools.cache
def nonfinite_kernel(src_kind, parallel):
    """Set ``flag[0] = 1`` if any source element is inf or NaN; never clears it."""
    xptr, XB = _pointer(src_kind)
    XK = src_kind

    @_chunk
    def chunk(p_addr, m):
        p = xptr(p_addr, m)
        bad = False
        for j in range(m):
            bad |= is_nonfinite(p[j], XK)
        return bad

    if XK == F64:
        @_chunk
        def chunk(p_addr, m):  # noqa: F811
            p = xptr(p_addr, m)
            bad = False
            for j in range(m):
                bad |= (p[j] - p[j]) != 0.0            # inf - inf and NaN - NaN are NaN
            return bad

    def kernel(seg_addr, seg_offset, chunk_seg, chunk_begin, flag):
        for c in prange(chunk_seg.size):
            s = chunk_seg[c]
            begin = chunk_begin[c]
            if chunk(seg_addr[s] + (begin - seg_offset[s]) * XB, chunk_begin[c + 1] - begin):
                flag[0] = 1

    return _compile(kernel, parallel)


@functools.cache
def window_kernel(ring_kind, src_kind, parallel):
    """Push the sources into a window of W snapshots and refresh its mean.

    The shadow has 3 float32 rows: 0 the mean, 1 and 2 a compensated (Neumaier) running
    sum of the snapshots in the window. The ring holds W rows of ``ring_kind`` (float32
    or bfloat16) at ``ring_addr`` (same layout as the shadow); row ``slot`` is replaced.
    The sum adds exactly what the ring stores and subtracts the evicted snapshot when
    ``full``; ``count`` is the number of snapshots after the push. With ``recompute`` the
    sum is rebuilt from the ``count`` ring rows in compensated float64 instead: a running
    sum's error grows with the pushes relative to the values' size, not the mean's, so
    the caller recomputes every W pushes and the mean stays within 2 ulp. A float64 ring
    (float64 sources) keeps the three rows and the arithmetic in float64.
    """
    rptr, RB = _pointer(ring_kind)
    xptr, XB = _pointer(src_kind)
    fptr = u32_pointer
    RK, XK = ring_kind, src_kind
    FB = 8 if RK == F64 else 4                         # bytes per element of the shadow rows

    @_chunk
    def push(mean_addr, sum_addr, comp_addr, ring0_addr, n, slot, p_addr, m, full, count):
        q, sm, cm = fptr(mean_addr, m), fptr(sum_addr, m), fptr(comp_addr, m)
        r, p = rptr(ring0_addr, m), xptr(p_addr, m)
        cnt = np.float32(count)
        for j in range(m):
            stored = encode(decode(p[j], XK), RK)
            old = r[slot * n + j]
            r[slot * n + j] = stored
            s, c = neumaier(as_float(sm[j]), as_float(cm[j]), as_float(decode(stored, RK)))
            if full:
                s, c = neumaier(s, c, -as_float(decode(old, RK)))
            q[j] = as_bits((s + c) / cnt)
            sm[j] = as_bits(s)
            cm[j] = as_bits(c)

    @_chunk
    def recompute_(mean_addr, sum_addr, comp_addr, ring0_addr, n, slot, p_addr, m, count):
        # rows outer, elements inner: contiguous, vectorisable loops over float64 scratch sums
        q, sm, cm = fptr(mean_addr, m), fptr(sum_addr, m), fptr(comp_addr, m)
        r, p = rptr(ring0_addr, m), xptr(p_addr, m)
        for j in range(m):
            r[slot * n + j] = encode(decode(p[j], XK), RK)
        s64 = np.zeros(m)
        c64 = np.zeros(m)
        for row in range(count):
            base = row * n
            for j in range(m):
                s64[j], c64[j] = neumaier(s64[j], c64[j], np.float64(as_float(decode(r[base + j], RK))))
        for j in range(m):
            total = s64[j] + c64[j]
            s = np.float32(total)
            q[j] = as_bits(np.float32(total / count))
            sm[j] = as_bits(s)
            cm[j] = as_bits(np.float32(total - np.float64(s)))

    if RK == F64:                                      # float64 sources: float64 ring, mean and sum
        rload, rstore = _access(RK)
        xload, _ = _access(XK)

        @_chunk
        def push(mean_addr, sum_addr, comp_addr, ring0_addr, n, slot, p_addr, m, full, count):  # noqa: F811
            q, sm, cm = f64_pointer(mean_addr, m), f64_pointer(sum_addr, m), f64_pointer(comp_addr, m)
            r, p = rptr(ring0_addr, m), xptr(p_addr, m)
            for j in range(m):
                old = rload(r, slot * n + j)
                rstore(r, slot * n + j, xload(p, j))
                s, c = neumaier(sm[j], cm[j], rload(r, slot * n + j))
                if full:
                    s, c = neumaier(s, c, -old)
                q[j] = (s + c) / count
                sm[j] = s
                cm[j] = c

        @_chunk
        def recompute_(mean_addr, sum_addr, comp_addr, ring0_addr, n, slot, p_addr, m, count):  # noqa: F811
            q, sm, cm = f64_pointer(mean_addr, m), f64_pointer(sum_addr, m), f64_pointer(comp_addr, m)
            r, p = rptr(ring0_addr, m), xptr(p_addr, m)
            for j in range(m):
                rstore(r, slot * n + j, xload(p, j))
            s64 = np.zeros(m)
            c64 = np.zeros(m)
            for row in range(count):
                base = row * n
                for j in range(m):
                    s64[j], c64[j] = neumaier(s64[j], c64[j], rload(r, base + j))
            for j in range(m):
                q[j] = (s64[j] + c64[j]) / count
                sm[j] = s64[j]
                cm[j] = c64[j]

    def kernel(n, shadow_addr, seg_addr, seg_offset, chunk_seg, chunk_begin, ring_addr, slot, full, count,
               recompute):
        for c in prange(chunk_seg.size):
            s = chunk_seg[c]
            begin = chunk_begin[c]
            within = begin - seg_offset[s]
            base = shadow_addr[s] + within * FB
            if recompute:
                recompute_(base, base + n * FB, base + 2 * n * FB, ring_addr[s] + within * RB, n, slot,
                           seg_addr[s] + within * XB, chunk_begin[c + 1] - begin, count)
            else:
                push(base, base + n * FB, base + 2 * n * FB, ring_addr[s] + within * RB, n, slot,
                     seg_addr[s] + within * XB, chunk_begin[c + 1] - begin, full, count)

    return _compile(kernel, parallel)
