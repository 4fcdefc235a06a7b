"""CPU kernels: the loop skeletons around :mod:`._elementwise` (numba, parallel over chunks).

Every weight kernel walks a group of source tensors through the tables of
:mod:`fastema.kernels.layout`; a flat source is a group of one segment.

Shared arguments (arrays 1-D, C-contiguous):
    n:           elements per shadow row (the row stride).
    shadow_addr: int64[S] address of each segment's shadow (row 0); row k lies
                 ``k * n`` elements further. Elements are the bits of float32, bfloat16
                 or float16 (uint32/uint16) or float64 values; written in place. A flat
                 shadow gives ``base + seg_offset[s] * itemsize``; a scattered one
                 (another model's tensors) gives each tensor's own address, with K = 1.
    seg_addr:    int64[S] address of each source tensor's first element.
    seg_offset:  int64[S + 1] where each source starts in the group's unpadded row; it starts past 0
                 for a shadow that holds a slice of the group (``fastema._launch.tables``'s ``base``),
                 and keys stochastic rounding's noise (``kinds.NOISE_ROW``); the shadow addresses
                 are read relative to each segment's start.
    chunk_seg:   int32[C] segment of each chunk.
    chunk_begin: int64[C + 1] chunk boundaries within a shadow row.

Kernels are built per (storage kinds, mode, parallel) by the ``*_kernel`` factories;
the kinds are closure constants, so the branches fold away. Each variant is compiled once
per machine: :func:`._cache.cached` keys numba's on-disk cache by what the closure captures,
so another process loads it instead of compiling it again. Each kernel is a loop over
chunks (``prange`` in the parallel twin) calling a separately compiled per-chunk function
whose loop indexes raw pointers from 0: LLVM vectorises that form, and keeps it
vectorised inside numba's parallel region (a loop written inline in the ``prange`` body
lost vectorisation there and ran no faster on two threads than on one).

The CUDA twins in :mod:`.cuda` take the same arguments and call the same element bodies.
"""
import functools

import numpy as np
from numba import njit, prange

from ._cache import cached
from ._cpu_hw import HW
from ._target import WINDOW, bind, bodies
from .kinds import F32, F64, ITEMSIZE, NOISE_ROW, SMA_PART, wide

E = bind(functools.partial(njit, inline="always"), HW)
# Bodies inlined straight into a prange loop (the metric kernels) get dispatchers of their own:
# numba reuses what it compiled for a serial caller of a shared inline function, and the
# parallel loop then calls it instead of inlining it (Smoother, 10**6 streams: 5 ms -> 160 ms).
E_PARALLEL = bind(functools.partial(njit, inline="always"), HW)
# The copy and swap kernels (construction, store/restore, the swap: not the per-step path) call theirs
# as functions of their own, which LLVM inlines when it links them: numba's inlining of a body takes
# every branch of it before the kinds fold them away (a swap's chunk inlined both packings and four
# conversions: 3 s of compile a variant, against 0.1 s), and most of CI's compile was these kernels'.
# So do the plan kernels their plan step (once a call, not per element: compiled and cached once for
# every variant, where inlined it took 5-6 s of each variant's 8 s of compile).
E_CALLED = bind(lambda fn: cached(njit(nogil=True)(fn)), HW)
_POINTERS = {F32: HW["u32_pointer"], F64: HW["f64_pointer"]}


def _pointer(kind):
    """(pointer intrinsic, bytes per element) for a storage kind."""
    return _POINTERS.get(kind, HW["u16_pointer"]), ITEMSIZE[kind]


def _compile(fn, parallel, refcounts=True):
    # nogil: a serial kernel lets other Python threads run too (an offloaded EMA folds on a worker
    # thread while the training thread goes on); parallel kernels release it around their loops
    return cached(njit(parallel=parallel, nogil=True, **({} if refcounts else _NO_REFCOUNTS))(fn))


# numba's runtime (NRT) off: no reference counting of the array arguments. The metric kernels' serial
# twins inline element bodies that take the arrays and branch; numba then keeps an atomic incref and
# decref of every array per element inside the loop (the refcount pruning pass does not remove them
# across the branches), and the loop does not vectorise: Smoother.update, EMA + SMA(50) at 10**6
# streams on one thread, 150-320 ms (EMA with nonfinite="skip" 28 ms) against 15 ms (0.8 ms) with it
# off. The parallel twins' loops are outlined by numba's parfor pass without those counts. A kernel
# compiled with it off cannot allocate (numba refuses to compile one that does).
_NO_REFCOUNTS = {"_nrt": False}


def _chunk(fn):
    return cached(njit(nogil=True)(fn))


@functools.cache
def lerp_kernel(shadow_kind, src_kind, stochastic, parallel, device_key=False):
    """``shadow[k] <- shadow[k] + w[k] * (src - shadow[k])`` for every row k (``_elementwise.lerp_at``).

    Extra arguments:
        weights: float32[K] array or tuple, ``w = 1 - decay`` per row (float64 for a
                 float64 kernel, which also widens a float32 array's values).
        flag:    int32[>=1]; when ``flag[0] != 0`` nothing is written (non-finite guard).
        key:     uint32 stochastic-rounding key (ignored unless ``stochastic``), or with
                 ``device_key`` an int64[1] array holding it (see ``_stats.plan_step``).
    """
    sptr, SB = _pointer(shadow_kind)
    xptr, XB = _pointer(src_kind)
    SK, XK, SR = shadow_kind, src_kind, stochastic
    load, lerp_at = bodies(E, wide(SK, XK), "load", "lerp_at")
    read_key = E.key_at if device_key else E.key_of

    @_chunk
    def chunk(q_addr, p_addr, m, w, first, key):
        q = sptr(q_addr, m)
        p = xptr(p_addr, m)
        for j in range(m):
            lerp_at(q, j, load(p, j, XK), w, SK, SR, key, first + j)

    def kernel(n, shadow_addr, seg_addr, seg_offset, chunk_seg, chunk_begin, weights, flag, key):
        if flag[0] != 0:
            return
        k32 = read_key(key)
        for c in prange(chunk_seg.size):
            s = chunk_seg[c]
            begin = chunk_begin[c]
            m = chunk_begin[c + 1] - begin
            within = begin - seg_offset[s]
            p_addr = seg_addr[s] + within * XB
            for k in range(len(weights)):          # rows after the first re-read the chunk from cache
                first = k * NOISE_ROW + begin      # the noise index (kinds.NOISE_ROW): row, then position
                chunk(shadow_addr[s] + (k * n + within) * SB, p_addr, m, weights[k], first, k32)

    return _compile(kernel, parallel)


@functools.cache
def bema_kernel(shadow_kind, parallel):
    """BEMA's bias correction over a 3-row shadow: ``shadow[0] <- shadow[1] + alpha * (shadow[0] -
    shadow[2])`` (``_elementwise.bema_at``); rows 1 and 2 are read only, the sources not at all.

    Extra arguments:
        alpha: float32 (float64 for a float64 shadow), the correction's weight.
        flag:  int32[>=1]; when ``flag[0] != 0`` nothing is written (non-finite guard).
    """
    sptr, SB = _pointer(shadow_kind)
    SK = shadow_kind
    bema_at, = bodies(E, SK == F64, "bema_at")

    @_chunk
    def chunk(q_addr, n, m, alpha):
        q = sptr(q_addr, 2 * n + m)
        for j in range(m):
            bema_at(q, n, j, alpha, SK)

    def kernel(n, shadow_addr, seg_addr, seg_offset, chunk_seg, chunk_begin, alpha, flag):
        if flag[0] != 0:
            return
        for c in prange(chunk_seg.size):
            s = chunk_seg[c]
            begin = chunk_begin[c]
            chunk(shadow_addr[s] + (begin - seg_offset[s]) * SB, n, chunk_begin[c + 1] - begin, alpha)

    return _compile(kernel, parallel)


@functools.cache
def plan_kernel():
    """One ``update()`` call of a model EMA's plan on the host (``_stats.plan_step``)."""
    plan_step = E_CALLED.plan_step

    def kernel(state, params, decays, given, w32, w64, flag, keys):
        plan_step(state, params, decays, given, w32, w64, flag, keys)

    return cached(njit(kernel))


@functools.cache
def plan_lerp_kernel(shadow_kind, src_kind, stochastic, parallel):
    """One ``update()`` call of a model EMA with its plan on the device, in one launch: the plan
    kernel's ``plan_step``, then, on a due call, :func:`lerp_kernel` with the weights it wrote
    (``w64`` for a float64 kernel, else ``w32``) and the rounding key of group ``gi``
    (``keys[gi]``). Bit for bit the plan kernel followed by the lerp.

    Arguments: the tables, then ``plan_kernel``'s (``state`` to ``keys``), then ``done``
    (int32[1], the CUDA twin's count of finished blocks; unused here) and ``gi``.
    """
    plan_step = E_CALLED.plan_step
    lerp = lerp_kernel(shadow_kind, src_kind, stochastic, parallel, True)
    WIDE = wide(shadow_kind, src_kind)

    def kernel(n, shadow_addr, seg_addr, seg_offset, chunk_seg, chunk_begin, state, params, decays, given, w32, w64,
               flag, keys, done, gi):
        plan_step(state, params, decays, given, w32, w64, flag, keys)
        if WIDE:
            lerp(n, shadow_addr, seg_addr, seg_offset, chunk_seg, chunk_begin, w64, flag, keys[gi:gi + 1])
        else:
            lerp(n, shadow_addr, seg_addr, seg_offset, chunk_seg, chunk_begin, w32, flag, keys[gi:gi + 1])

    return _compile(kernel, False)          # the lerp it calls is the parallel one when ``parallel``


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
    copy_at, = bodies(E_CALLED, wide(SK, XK) and SK != XK, "copy_at")

    @_chunk
    def chunk(q_addr, p_addr, m):
        q = sptr(q_addr, m)
        p = xptr(p_addr, m)
        for j in range(m):
            if TO:
                copy_at(q, j, p, j, XK, SK)
            else:
                copy_at(p, j, q, j, SK, XK)

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
    """Exchange shadow row ``row`` and the sources in place (``_elementwise.swap_at``)."""
    sptr, SB = _pointer(shadow_kind)
    xptr, XB = _pointer(src_kind)
    SK, XK, MODE = shadow_kind, src_kind, mode
    swap_at, = bodies(E_CALLED, wide(SK, XK), "swap_at")

    @_chunk
    def chunk(q_addr, p_addr, m):
        q = sptr(q_addr, m)
        p = xptr(p_addr, m)
        for j in range(m):
            swap_at(q, j, p, j, SK, XK, MODE)

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
    nonfinite_at, = bodies(E, XK == F64, "nonfinite_at")

    @_chunk
    def chunk(p_addr, m):
        p = xptr(p_addr, m)
        bad = False
        for j in range(m):
            bad |= nonfinite_at(p, j, XK)
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
    """Push the sources into a window of W snapshots and refresh its mean (``_elementwise.window_at``).

    The shadow has 3 rows: 0 the mean, 1 and 2 a compensated (Neumaier) running sum of
    the snapshots in the window, float32 (float64 for a float64 ring). The ring holds W
    rows of ``ring_kind`` at ``ring_addr`` (same layout as the shadow); row ``slot`` is
    replaced; ``count`` is the number of snapshots after the push; ``recompute`` rebuilds
    the sum from the ring.
    """
    rptr, RB = _pointer(ring_kind)
    xptr, XB = _pointer(src_kind)
    RK, XK = ring_kind, src_kind
    fptr, FB = _pointer(F64 if RK == F64 else F32)       # the shadow rows
    push_at, store_at, add_at, mean_at = bodies(E, RK == F64, *WINDOW)

    @_chunk
    def push(mean_addr, sum_addr, comp_addr, ring0_addr, n, slot, p_addr, m, full, count):
        q, sm, cm = fptr(mean_addr, m), fptr(sum_addr, m), fptr(comp_addr, m)
        r, p = rptr(ring0_addr, m), xptr(p_addr, m)
        for j in range(m):
            push_at(q, sm, cm, r, n, slot, p, j, full, count, RK, XK)

    @_chunk
    def recompute_(mean_addr, sum_addr, comp_addr, ring0_addr, n, slot, p_addr, m, count):
        # rows outer, elements inner: contiguous, vectorisable loops over float64 scratch sums
        q, sm, cm = fptr(mean_addr, m), fptr(sum_addr, m), fptr(comp_addr, m)
        r, p = rptr(ring0_addr, m), xptr(p_addr, m)
        for j in range(m):
            store_at(r, n, slot, p, j, RK, XK)
        s64 = np.zeros(m)
        c64 = np.zeros(m)
        for row in range(count):
            base = row * n
            for j in range(m):
                s64[j], c64[j] = add_at(s64[j], c64[j], r, base + j, RK)
        for j in range(m):
            mean_at(q, sm, cm, j, s64[j], c64[j], count)

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


# ---------------------------------------------------------------- metric smoothers (K streams)
# Arguments (1-D, C-contiguous): y: K values, float64 or the bits of a narrower ``kind``;
# w0, c, per_stream: the sample weight, the float ``w0``, or ``c[k] * w0`` (c float64[K], a
# NaN, inf or negative c[k] counting as 0) when ``per_stream``.


@functools.cache
def streams_kernel(kind, parts, skip, weighted, parallel):
    """A smoother's update of K streams in one pass: the EMA and the SMA (``parts``: ``kinds.EMA_PART``,
    ``SMA_PART`` or both), unweighted (``_elementwise.streams_at``) or weighted (``streams_weighted_at``,
    after ``streams_widen_at`` when ``widen``).

    Arguments (1-D, C-contiguous): ``y`` (K values), ``w0, c, per_stream`` (the weights, as above:
    weighted only), ``mode`` (``kinds.DEBIASED``...), ``d`` (the decay), ``ab`` float64[2K] (the EMA's
    interleaved pairs), ``ring_v`` float64[W * K], ``sc`` float64[2K] (the pairs (s, comp)), ``n``
    int32[K], then the weighted layout's ``ring_w`` float64[W * K], ``wsc`` float64[2K] (ws, wcomp),
    ``bad`` int32[K] (any arrays when unweighted), ``slot`` (the ring slot this value goes to),
    ``filled`` (the ring slots holding an entry before it, ``min(count, W)``) and ``widen``.
    Unweighted, a float64 value moves 96 bytes a stream (EMA and SMA): y 8, (a, b) 16 + 16,
    ``ring_v`` 8 + 8, (s, comp) 16 + 16, n 4 + 4."""
    K, P, SKIP, WEIGHTED = kind, parts, skip, weighted
    SMA = bool(parts & SMA_PART)
    E_ = E_PARALLEL if parallel else E
    streams_at, weighted_at, widen_at = E_.streams_at, E_.streams_weighted_at, E_.streams_widen_at

    def kernel(y, w0, c, per_stream, mode, d, ab, ring_v, sc, n, ring_w, wsc, bad, slot, filled, widen):
        size = y.size
        base = slot * size
        full = filled * size == ring_v.size
        for k in prange(size):
            if WEIGHTED:
                if SMA and widen:
                    widen_at(k, size, ring_v, ring_w, wsc, n, bad, filled, SKIP)
                weighted_at(y, k, w0, c, per_stream, mode, d, ab, ring_v, sc, n, ring_w, wsc, bad, base + k, K, P,
                            SKIP)
            else:
                streams_at(y, k, mode, d, ab, ring_v, sc, n, base + k, full, K, P, SKIP)

    return _compile(kernel, parallel, refcounts=parallel)     # see _NO_REFCOUNTS


@functools.cache
def bad_weight_kernel():
    """The index of the first per-stream sample weight in ``c`` (float64[K]) that the smoother
    kernels would count as 0 (``_elementwise.good_weight``: NaN, inf, negative), or -1."""
    good_weight = E.good_weight

    def kernel(c):
        for k in range(c.size):
            if not good_weight(c[k]):
                return k
        return -1

    return _compile(kernel, False)
