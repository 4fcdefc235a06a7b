"""CUDA kernels (numba-cuda): the grid-stride skeletons around :mod:`._elementwise`.

Same arguments, semantics and element bodies as the CPU kernels of :mod:`.cpu`. Each
block takes whole chunks (grid-stride over chunks) and its threads stride through the
chunk, so any grid and block size is correct. Launch on the caller's stream:
``kernel[grid, block, stream](...)``. Every address in ``seg_addr`` must be device memory
of the launching context. Imported only when a CUDA buffer arrives.
"""
import functools

import numpy as np
from numba import cuda

from ._cuda_copy import copy_kernel, swap_kernel  # noqa: F401  (re-exported)
from ._cuda_hw import VECTORS
from ._cuda_hw import types as numba_types
from ._cuda_jit import M16 as _M16
from ._cuda_jit import M32 as _M32
from ._cuda_jit import S16 as _S16
from ._cuda_jit import S32 as _S32
from ._cuda_jit import Z32 as _Z32
from ._cuda_jit import E
from ._cuda_jit import jit as _jit
from ._cuda_jit import pointer as _pointer
from ._cuda_scan import SCAN_BOUNDS, nonfinite_kernel  # noqa: F401  (re-exported: the launchers' one module)
from ._cuda_stream import streams_kernel  # noqa: F401  (re-exported)
from ._store.identity import variant as _variant
from ._target import WINDOW, bodies
from .kinds import F32, F64, ITEMSIZE, MAX_ROWS, NOISE_ROW, PLAN_KEYS_MAX, S_NORMS, wide

PLAN_LERP_BOUNDS = (256, 4)
"""The launch bounds of :func:`plan_lerp_kernel` (nearest rounding): at most 256 threads a block
(``fastema._launch.config.CUDA_THREADS``) and 4 blocks resident per multiprocessor, which holds it to 64
registers (62 on sm_90, no spill; 72 and 3 blocks before :func:`_lerp_chunks` counted chunks and vectors
in 32 bits: at 64 that spilled the chunk counter). Checked on the machine code by
``bench/tests/test_sass.py``, with ``config.CUDA_PLAN_LERP_BLOCKS_PER_SM``; ``kernels._bounds`` lowers it
where a toolchain spills."""
SR_LERP_BOUNDS = (256, 4)
"""The launch bounds of the stochastic-rounding :func:`lerp_kernel` and :func:`plan_lerp_kernel`: 4 blocks
per multiprocessor, 64 registers. The plain lerp's 8 lanes of noise hashes took 80 with device weights
without them, and the fused kernel 80 (3 blocks: 24 KiB of loads in flight per SM); under them, with the
noise's first round shared by a vector's lanes and a 32-bit vector counter, 64 and no spill: 32 KiB in
flight (16 bytes of shadow and 16 of source a thread)."""


@_variant
def lerp_kernel(shadow_kind, src_kind, stochastic, device_key=False):
    """See :func:`fastema.kernels.cpu.lerp_kernel`; each thread reads a source element once
    (:func:`_lerp_chunks`)."""
    lerp_chunks = _lerp_chunks(shadow_kind, src_kind, stochastic)
    read_key = E.key_at if device_key else E.key_of

    def kernel(n, shadow_addr, seg_addr, seg_offset, chunk_seg, chunk_begin, weights, flag, key_arg):
        if flag[0] != 0:
            return
        lerp_chunks(n, shadow_addr, seg_addr, seg_offset, chunk_seg, chunk_begin, weights, read_key(key_arg))

    return _jit(kernel, launch_bounds=SR_LERP_BOUNDS) if stochastic else _jit(kernel)


@_variant
def plan_lerp_kernel(shadow_kind, src_kind, stochastic):
    """See :func:`fastema.kernels.cpu.plan_lerp_kernel`: the plan kernel and the lerp in one launch.

    Every block's first thread runs ``plan_step`` on the block's own copy of the plan arrays (in
    shared memory, read from the device arrays at the start), so every block lerps with the
    weights, skip flag and key of this call while no block has written the device arrays yet.
    Each block then counts itself finished in ``done[0]`` (after a fence); the last one, when
    every block has read the arrays, writes its copy back and sets ``done[0]`` to 0 for the next
    launch. The same ``plan_step`` on the same values: the arrays end as the plan kernel leaves
    them, and the shadow as the lerp after it leaves it. Needs ``keys.size <= PLAN_KEYS_MAX``.
    """
    lerp_chunks = _lerp_chunks(shadow_kind, src_kind, stochastic)
    plan_step, key_at = E.plan_step, E.key_at
    WIDE = wide(shadow_kind, src_kind)
    f64, f32 = numba_types.float64, numba_types.float32
    i64, i32 = numba_types.int64, numba_types.int32
    STATE = S_NORMS + MAX_ROWS

    def kernel(n, shadow_addr, seg_addr, seg_offset, chunk_seg, chunk_begin, state, params, decays, given, w32, w64,
               flag, keys, done, gi):
        st = cuda.shared.array(STATE, f64)[:state.size]
        s32 = cuda.shared.array(MAX_ROWS, f32)[:w32.size]
        s64 = cuda.shared.array(MAX_ROWS, f64)[:w64.size]
        sk = cuda.shared.array(PLAN_KEYS_MAX, i64)[:keys.size]
        sf = cuda.shared.array(1, i32)
        first = cuda.threadIdx.x == 0
        if first:
            _copy(st, state)
            _copy(s32, w32)
            _copy(s64, w64)
            _copy(sk, keys)
            sf[0] = flag[0]
            plan_step(st, params, decays, given, s32, s64, sf, sk)
        cuda.syncthreads()
        if sf[0] == 0:
            key = key_at(sk[gi:gi + 1])
            if WIDE:
                lerp_chunks(n, shadow_addr, seg_addr, seg_offset, chunk_seg, chunk_begin, s64, key)
            else:
                lerp_chunks(n, shadow_addr, seg_addr, seg_offset, chunk_seg, chunk_begin, s32, key)
        if first:
            cuda.threadfence()
            if cuda.atomic.add(done, 0, 1) == cuda.gridDim.x - 1:     # every other block has read the arrays
                _copy(state, st)
                _copy(w32, s32)
                _copy(w64, s64)
                _copy(keys, sk)
                flag[0] = sf[0]
                done[0] = 0

    if WIDE:
        return _jit(kernel)
    return _jit(kernel, launch_bounds=SR_LERP_BOUNDS if stochastic else PLAN_LERP_BOUNDS)


@cuda.jit(device=True, inline="always")
def _copy(to, frm):
    for i in range(to.size):
        to[i] = frm[i]


@functools.cache
def _lerp_chunks(shadow_kind, src_kind, stochastic):
    """The lerp of every chunk this block takes (grid-stride over chunks, threads over elements):
    an inlined device function, the body of :func:`lerp_kernel` and :func:`plan_lerp_kernel`.

    A float32 shadow (nearest rounding) takes the vector path wherever a chunk's source and
    shadow rows are aligned: 16-byte shadow loads and stores and 16- or 8-byte source loads,
    four elements each, two vectors per thread; a 16-bit shadow (nearest or stochastic) takes
    vectors of 8 elements: a 16-byte shadow load and store and one or two 16-byte source loads.
    Every load of a thread's first row is issued before it waits for any (the source's conversion
    comes after the shadow's loads), then the chunk's tail goes element by element. Alignment is
    checked per chunk from the addresses themselves, so any layout is correct and unaligned chunks
    take the scalar loop. The element arithmetic, the stochastic rounding's noise index included,
    is the scalar loop's (the CPU's): the same bits either way.
    """
    xptr, sptr = _pointer(src_kind), _pointer(shadow_kind)
    SK, XK, SR = shadow_kind, src_kind, stochastic
    load, lerp_at = bodies(E, wide(SK, XK), "load", "lerp_at")
    VEC = SK == F32 and XK != F64 and not SR
    V16 = SK != F32 and SK != F64 and XK != F64         # a 16-bit shadow: vectors of 8 elements, 16 bytes
    XB = ITEMSIZE[XK]
    XMASK = 4 * XB - 1                                   # a source vector is 4 elements: 16 or 8 bytes
    to_float, lerp_bits, lerp_bits_noise = E.to_float, E.lerp_bits, E.lerp_bits_noise
    sr_noise_first, sr_noise_last = E.sr_noise_first, E.sr_noise_last
    load4_q, store4_q = VECTORS["load4_u32"], VECTORS["store4_u32"]
    load4_x = VECTORS["load4_u32"] if XB == 4 else VECTORS["load4_u16"]
    f32, u32 = numba_types.float32, numba_types.uint32

    @cuda.jit(device=True, inline="always")
    def shadow_vectors(ev, q0, q1):
        """A row's two shadow vectors (at addresses ``q0`` and ``q1``) into ``ev``."""
        ev[0], ev[1], ev[2], ev[3] = load4_q(q0)
        ev[4], ev[5], ev[6], ev[7] = load4_q(q1)

    @cuda.jit(device=True, inline="always")
    def lerp_vectors(ev, xv, q0, q1, two, w, key):
        """``ev`` lerped toward the source values ``xv`` and stored back (the second vector if ``two``)."""
        for lane in range(8):
            ev[lane] = lerp_bits(ev[lane], xv[lane], w, SK, SR, key, 0)
        store4_q(q0, ev[0], ev[1], ev[2], ev[3])
        if two:
            store4_q(q1, ev[4], ev[5], ev[6], ev[7])

    @cuda.jit(device=True, inline="always")
    def source8(xv, xw, pa, j0):
        """The source's 8 elements from position ``j0`` (16-byte aligned) as float32 values into ``xv``
        (``xw``: its 32-bit words; 16-bit elements two a word, the first in the low half)."""
        xw[0], xw[1], xw[2], xw[3] = load4_q(pa + j0 * XB)
        if XB == 4:
            xw[4], xw[5], xw[6], xw[7] = load4_q(pa + j0 * XB + 16)
        for lane in range(8):                            # one body, unrolled by the compiler
            if XB == 4:
                xv[lane] = to_float(xw[lane], XK)
            else:
                xv[lane] = to_float((xw[lane >> 1] >> (_S16 * np.uint32(lane & 1))) & _M16, XK)

    @cuda.jit(device=True, inline="always")
    def lerp8(ev, xv, q0, w, key, i):
        """A 16-bit shadow's 8 elements (bits in ``ev[0:4]``, two a word, the first in the low half) lerped
        toward ``xv`` with weight ``w`` and stored at ``q0``; ``i``: the noise index of the first, as the
        scalar loop's."""
        ev[4], ev[5], ev[6], ev[7] = _Z32, _Z32, _Z32, _Z32
        if SR:                                           # the noise's first round, shared by the 8 lanes: it
            i64 = np.uint64(i)                           # sees the index's high half only (two of them where
            low = np.uint32(i64 & _M32)                  # the lanes cross a multiple of 2**32)
            first0 = sr_noise_first(i64 >> _S32)
            first1 = sr_noise_first((i64 >> _S32) + np.uint64(1))
        for lane in range(8):                            # one body, unrolled by the compiler
            half = _S16 * np.uint32(lane & 1)
            e = (ev[lane >> 1] >> half) & _M16
            if SR:
                at = np.uint32((np.uint64(low) + np.uint64(lane)) & _M32)   # the lane's low half, wrapped
                noise = sr_noise_last(first1 if at < low else first0, key, at)
                bits = lerp_bits_noise(e, xv[lane], w, SK, noise)
            else:
                bits = lerp_bits(e, xv[lane], w, SK, False, key, i + lane)
            ev[4 + (lane >> 1)] |= bits << half
        store4_q(q0, ev[4], ev[5], ev[6], ev[7])

    def lerp_chunks(n, shadow_addr, seg_addr, seg_offset, chunk_seg, chunk_begin, weights, key):
        rows = len(weights)
        step = cuda.blockDim.x
        rows_aligned = rows == 1 or (n & 3) == 0
        rows_aligned8 = rows == 1 or (n & 7) == 0
        xv = cuda.local.array(8, f32)                    # two vectors of source values
        ev = cuda.local.array(8, u32)                    # and of shadow bits (registers once unrolled)
        xw = cuda.local.array(8, u32)                    # a 16-bit shadow's source words
        for c in range(np.int32(cuda.blockIdx.x), np.int32(chunk_seg.size), np.int32(cuda.gridDim.x)):
            s = chunk_seg[c]                             # 32-bit counters (chunk_seg is int32): 8-16 registers
            off = seg_offset[s]                          # fewer in every lerp
            lo = chunk_begin[c] - off                    # the chunk, as positions within its source
            hi = chunk_begin[c + 1] - off
            qa = shadow_addr[s]
            pa = seg_addr[s]
            start = lo
            if VEC and rows_aligned and ((qa + lo * 4) & 15) == 0 and ((pa + lo * XB) & XMASK) == 0:
                vectors = np.int32((hi - lo) // 4)
                for v in range(np.int32(cuda.threadIdx.x), vectors, np.int32(2 * step)):
                    j0 = lo + 4 * v
                    two = v + step < vectors
                    j1 = j0 + 4 * step if two else j0    # no second vector: the first, loaded again, never stored
                    shadow_vectors(ev, qa + j0 * 4, qa + j1 * 4)   # the first row's shadow, then the source:
                    a0, a1, a2, a3 = load4_x(pa + j0 * XB)          # every load issued before the first wait
                    b0, b1, b2, b3 = load4_x(pa + j1 * XB)          # (the source's conversion)
                    xv[0], xv[1] = to_float(a0, XK), to_float(a1, XK)
                    xv[2], xv[3] = to_float(a2, XK), to_float(a3, XK)
                    xv[4], xv[5] = to_float(b0, XK), to_float(b1, XK)
                    xv[6], xv[7] = to_float(b2, XK), to_float(b3, XK)
                    for k in range(rows):
                        q0 = qa + (k * n + j0) * 4
                        q1 = qa + (k * n + j1) * 4
                        if k > 0:
                            shadow_vectors(ev, q0, q1)
                        lerp_vectors(ev, xv, q0, q1, two, weights[k], key)
                start = lo + 4 * vectors
            elif V16 and rows_aligned8 and ((qa + lo * 2) & 15) == 0 and ((pa + lo * XB) & 15) == 0:
                vectors = np.int32((hi - lo) // 8)           # 32-bit: 4 registers fewer, the SR plan kernel
                for v in range(np.int32(cuda.threadIdx.x), vectors, np.int32(step)):   # fits 64 (no spill)
                    j0 = lo + 8 * v
                    q0 = qa + j0 * 2
                    ev[0], ev[1], ev[2], ev[3] = load4_q(q0)    # the first row's shadow, then the source
                    source8(xv, xw, pa, j0)
                    lerp8(ev, xv, q0, weights[0], key, j0 + off)   # the first row peeled: its loads in one wait
                    for k in range(1, rows):
                        q0 = qa + (k * n + j0) * 2
                        ev[0], ev[1], ev[2], ev[3] = load4_q(q0)
                        lerp8(ev, xv, q0, weights[k], key, k * NOISE_ROW + j0 + off)
                start = lo + 8 * vectors
            p = xptr(pa, seg_offset[s + 1] - off)
            q = sptr(qa, (rows - 1) * n + seg_offset[s + 1] - off)
            for j in range(start + cuda.threadIdx.x, hi, step):
                x = load(p, j, XK)
                for k in range(rows):
                    lerp_at(q, k * n + j, x, weights[k], SK, SR, key, k * NOISE_ROW + j + off)

    return cuda.jit(device=True, inline="always")(lerp_chunks)


@_variant
def bema_kernel(shadow_kind):
    """See :func:`fastema.kernels.cpu.bema_kernel` (grid-stride over chunks, threads over elements)."""
    sptr = _pointer(shadow_kind)
    SK = shadow_kind
    bema_at, = bodies(E, SK == F64, "bema_at")

    def kernel(n, shadow_addr, seg_addr, seg_offset, chunk_seg, chunk_begin, alpha, flag):
        if flag[0] != 0:
            return
        for c in range(cuda.blockIdx.x, chunk_seg.size, cuda.gridDim.x):
            s = chunk_seg[c]
            off = seg_offset[s]
            q = sptr(shadow_addr[s], 2 * n + seg_offset[s + 1] - off)
            for i in range(chunk_begin[c] + cuda.threadIdx.x, chunk_begin[c + 1], cuda.blockDim.x):
                bema_at(q, n, i - off, alpha, SK)

    return _jit(kernel)


@_variant
def window_kernel(ring_kind, src_kind):
    """See :func:`fastema.kernels.cpu.window_kernel`."""
    rptr, xptr = _pointer(ring_kind), _pointer(src_kind)
    RK, XK = ring_kind, src_kind
    fptr, FB = (_pointer(F64), 8) if RK == F64 else (_pointer(F32), 4)     # the shadow rows
    push_at, store_at, add_at, mean_at = bodies(E, RK == F64, *WINDOW)

    def kernel(n, shadow_addr, seg_addr, seg_offset, chunk_seg, chunk_begin, ring_addr, slot, full, count,
               recompute):
        for c in range(cuda.blockIdx.x, chunk_seg.size, cuda.gridDim.x):
            s = chunk_seg[c]
            off = seg_offset[s]
            length = seg_offset[s + 1] - off
            p = xptr(seg_addr[s], length)
            q = fptr(shadow_addr[s], length)
            sm = fptr(shadow_addr[s] + n * FB, length)
            cm = fptr(shadow_addr[s] + 2 * n * FB, length)
            r = rptr(ring_addr[s], (count if count > slot + 1 else slot + 1) * n)
            for i in range(chunk_begin[c] + cuda.threadIdx.x, chunk_begin[c + 1], cuda.blockDim.x):
                j = i - off
                if recompute:                  # one thread per element: the rows in order
                    store_at(r, n, slot, p, j, RK, XK)
                    s64, c64 = 0.0, 0.0
                    for row in range(count):
                        s64, c64 = add_at(s64, c64, r, row * n + j, RK)
                    mean_at(q, sm, cm, j, s64, c64, count)
                else:
                    push_at(q, sm, cm, r, n, slot, p, j, full, count, RK, XK)

    return _jit(kernel)


@_variant
def plan_kernel():
    """See :func:`fastema.kernels.cpu.plan_kernel` (the first thread does it)."""
    plan_step = E.plan_step

    def kernel(state, params, decays, given, w32, w64, flag, keys):
        if cuda.grid(1) == 0:
            plan_step(state, params, decays, given, w32, w64, flag, keys)

    return _jit(kernel)


@_variant
def zero_kernel():
    """``a[:] = 0`` (an int32 flag): zeroing on the stream, capturable, no host copy."""

    def kernel(a):
        for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
            a[i] = 0

    return _jit(kernel)
