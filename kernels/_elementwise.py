"""The element bodies of every kernel, written once for every target.

Each function here does the work of one element (an index into raw pointers or arrays).
The loop skeletons, per target, are all that :mod:`.cpu` (a chunk loop under ``prange``)
and :mod:`.cuda` (a grid-stride loop) add. Plain Python: :func:`._target.bind` compiles
these for a target with their global names (``decode``, ``neumaier``, ``as_float``,
``fma``, ...) bound to that target's compiled versions, and called from Python they run
as they read (the hardware names then are the plain versions of :mod:`._intrinsics`).

Storage kinds and modes are arguments that the skeletons pass as compile-time constants,
so their branches fold away. Narrow bodies compute in float32 on float32 bit patterns;
``*_wide`` bodies compute in float64 and serve any kernel that meets a float64 buffer.
"""
import math

import numpy as np

from ._bits import decode, encode, encode_bf16_sr, is_nonfinite, pack_bf16, sr_noise, unpack_bf16
from ._intrinsics import python_versions
from ._stats import ema_step, neumaier
from .kinds import EMA_PART, F64, PACK, SMA_PART, STREAM_SCALE, UNPACK

_hw = python_versions()                       # replaced per target by _target.bind
as_float, as_bits, fma = _hw["as_float"], _hw["as_bits"], _hw["fma"]
load_pair, store_pair = _hw["load_pair"], _hw["store_pair"]

# ---------------------------------------------------------------- loads, stores, conversion


def load(p, j, kind):
    """Element ``j`` of storage ``kind`` as a float32 value (exact)."""
    return to_float(p[j], kind)


def to_float(bits, kind):
    """Stored bits of ``kind`` (not float64) as a float32 value (exact)."""
    return as_float(decode(bits, kind))


def load_wide(p, j, kind):
    """Element ``j`` of storage ``kind`` as a float64 value (exact)."""
    if kind == F64:
        return p[j]
    return np.float64(as_float(decode(p[j], kind)))


def store_wide(p, j, v, kind):
    """Store float64 ``v`` as storage ``kind`` (through float32, to nearest even, when narrower)."""
    if kind == F64:
        p[j] = v
    else:
        p[j] = encode(as_bits(np.float32(v)), kind)


def convert(bits, src_kind, dst_kind):
    """Stored bits of ``src_kind`` as stored bits of ``dst_kind``: exact when the kinds match,
    else rounded to nearest even."""
    if src_kind == dst_kind:
        return bits
    return encode(decode(bits, src_kind), dst_kind)


# ---------------------------------------------------------------- lerp: the EMA update


def lerp32(e, x, w):
    """``torch.lerp(e, x, w)`` in float32: from ``e`` when ``|w| < 0.5``, else from ``x``,
    with one rounding (FMA), so results equal ``torch.lerp_`` bit for bit."""
    small = abs(w) < np.float32(0.5)
    return fma(w if small else w - np.float32(1.0), x - e, e if small else x)


def lerp64(e, x, w):
    """:func:`lerp32` in float64."""
    small = abs(w) < 0.5
    return fma(w if small else w - 1.0, x - e, e if small else x)


def lerp_at(q, j, x, w, kind, stochastic, key, index):
    """``q[j] <- lerp(q[j], x, w)`` for a float32 source value ``x``, stored as ``kind``: to
    nearest even, or stochastically (bfloat16) with the noise of ``index`` under ``key``."""
    q[j] = lerp_bits(q[j], x, w, kind, stochastic, key, index)


def lerp_bits(e, x, w, kind, stochastic, key, index):
    """The stored bits of ``lerp(e, x, w)`` for shadow bits ``e`` of ``kind`` (see :func:`lerp_at`)."""
    y = as_bits(lerp32(to_float(e, kind), x, np.float32(w)))
    if stochastic:
        return encode_bf16_sr(y, sr_noise(key, index))
    return encode(y, kind)


def lerp_bits_noise(e, x, w, kind, noise):
    """:func:`lerp_bits`, stochastically rounded with the random bits ``noise`` (:func:`sr_noise`'s)."""
    return encode_bf16_sr(as_bits(lerp32(to_float(e, kind), x, np.float32(w))), noise)


def lerp_at_wide(q, j, x, w, kind, stochastic, key, index):
    """:func:`lerp_at` in float64 (``x`` float64; no stochastic rounding)."""
    store_wide(q, j, lerp64(load_wide(q, j, kind), x, np.float64(w)), kind)


# ---------------------------------------------------------------- BEMA: the bias correction


def bema_at(q, n, j, alpha, kind):
    """BEMA's output at element ``j`` of three shadow rows ``n`` apart (row 0 ``theta_t`` in,
    the output out; row 1 the EMA; row 2 ``theta_0``): ``q[j] <- ema + alpha * (q[j] - first)``.

    float32 math for float32 and narrower kinds (``alpha`` float32): the difference rounds once,
    the product and sum once more (FMA), then the result to ``kind``, nearest even."""
    out = load(q, j, kind)
    ema = load(q, n + j, kind)
    first = load(q, 2 * n + j, kind)
    q[j] = encode(as_bits(fma(np.float32(alpha), out - first, ema)), kind)


def bema_at_wide(q, n, j, alpha, kind):
    """:func:`bema_at` in float64 (``alpha`` float64)."""
    out = load_wide(q, j, kind)
    ema = load_wide(q, n + j, kind)
    first = load_wide(q, 2 * n + j, kind)
    store_wide(q, j, fma(np.float64(alpha), out - first, ema), kind)


# ---------------------------------------------------------------- copy, swap, scan


def copy_at(dst, i, src, j, src_kind, dst_kind):
    """``dst[i] <- src[j]`` converted between kinds (bits copied exactly when they match)."""
    dst[i] = convert(src[j], src_kind, dst_kind)


def copy_at_wide(dst, i, src, j, src_kind, dst_kind):
    """:func:`copy_at` through float64 (float64 on one side only)."""
    store_wide(dst, i, load_wide(src, j, src_kind), dst_kind)


def swap_at(q, i, p, j, shadow_kind, src_kind, mode):
    """Exchange shadow ``q[i]`` and source ``p[j]``. ``EXCHANGE`` converts both ways (exact
    when the kinds match); ``PACK``/``UNPACK`` (float32 shadow, bfloat16 source) put the
    rounded shadow into the source and keep both exactly (see ``_bits.pack_bf16``)."""
    q[i], p[j] = swap_bits(q[i], p[j], shadow_kind, src_kind, mode)


def swap_bits(a, b, shadow_kind, src_kind, mode):
    """The stored bits ``(shadow, source)`` that :func:`swap_at` leaves of shadow bits ``a`` and
    source bits ``b``."""
    if mode == PACK:
        return pack_bf16(a, b)
    if mode == UNPACK:
        return unpack_bf16(a, b)
    return convert(b, src_kind, shadow_kind), convert(a, shadow_kind, src_kind)


def swap_at_wide(q, i, p, j, shadow_kind, src_kind, mode):
    """:func:`swap_at` through float64 (``EXCHANGE`` only; exact when both are float64)."""
    a = load_wide(q, i, shadow_kind)
    b = load_wide(p, j, src_kind)
    store_wide(q, i, b, shadow_kind)
    store_wide(p, j, a, src_kind)


def nonfinite_at(p, j, kind):
    """True when element ``j`` is inf or NaN (an integer test on the bits)."""
    return is_nonfinite(p[j], kind)


def nonfinite_at_wide(p, j, kind):
    """:func:`nonfinite_at` for float64: ``v - v`` is NaN exactly for inf and NaN."""
    return (p[j] - p[j]) != 0.0


# ---------------------------------------------------------------- window of snapshots


def window_at(mean, total, comp, ring, n, slot, p, j, full, count, ring_kind, src_kind):
    """Push source ``p[j]`` into ring row ``slot`` (rows ``n`` apart) and refresh element ``j``
    of the window's float32 ``mean`` and its compensated sum ``(total, comp)``.

    The sum adds exactly what the ring stores and subtracts the evicted snapshot when
    ``full``; ``count`` is the number of snapshots after the push. A running sum's error
    grows with the pushes relative to the values' size, so every W pushes the caller
    rebuilds it from the ring instead (:func:`window_store_at`, then :func:`window_add_at`
    over the rows in order, then :func:`window_mean_at`) and the mean stays within 2 ulp.
    """
    at = slot * n + j
    stored = convert(p[j], src_kind, ring_kind)
    old = ring[at]
    ring[at] = stored
    s, c = neumaier(as_float(total[j]), as_float(comp[j]), as_float(decode(stored, ring_kind)))
    if full:
        s, c = neumaier(s, c, -as_float(decode(old, ring_kind)))
    mean[j] = as_bits((s + c) / np.float32(count))
    total[j] = as_bits(s)
    comp[j] = as_bits(c)


def window_store_at(ring, n, slot, p, j, ring_kind, src_kind):
    """Ring row ``slot`` <- source ``p[j]`` (the push of a recomputing round)."""
    ring[slot * n + j] = convert(p[j], src_kind, ring_kind)


def window_add_at(s, c, ring, at, ring_kind):
    """The compensated float64 sum ``(s, c)`` plus ring element ``at``."""
    return neumaier(s, c, np.float64(load(ring, at, ring_kind)))


def window_mean_at(mean, total, comp, j, s, c, count):
    """Element ``j`` of the float32 mean and running sum from the rebuilt float64 sum ``(s, c)``."""
    t = s + c
    s32 = np.float32(t)
    mean[j] = as_bits(np.float32(t / count))
    total[j] = as_bits(s32)
    comp[j] = as_bits(np.float32(t - np.float64(s32)))


def window_at_wide(mean, total, comp, ring, n, slot, p, j, full, count, ring_kind, src_kind):
    """:func:`window_at` for float64 sources: float64 ring, mean and sum."""
    at = slot * n + j
    old = load_wide(ring, at, ring_kind)
    store_wide(ring, at, load_wide(p, j, src_kind), ring_kind)
    s, c = neumaier(total[j], comp[j], load_wide(ring, at, ring_kind))
    if full:
        s, c = neumaier(s, c, -old)
    mean[j] = (s + c) / count
    total[j] = s
    comp[j] = c


def window_store_at_wide(ring, n, slot, p, j, ring_kind, src_kind):
    """:func:`window_store_at` for a float64 ring."""
    store_wide(ring, slot * n + j, load_wide(p, j, src_kind), ring_kind)


def window_add_at_wide(s, c, ring, at, ring_kind):
    """:func:`window_add_at` for a float64 ring."""
    return neumaier(s, c, load_wide(ring, at, ring_kind))


def window_mean_at_wide(mean, total, comp, j, s, c, count):
    """:func:`window_mean_at` for float64 rows."""
    mean[j] = (s + c) / count
    total[j] = s
    comp[j] = c


# ---------------------------------------------------------------- metric streams (Smoother)


def metric_at(y, k, kind):
    """Value ``k`` of a metric array (float64, or the bits of a narrower kind) as float64."""
    return y[k] if kind == F64 else np.float64(as_float(decode(y[k], kind)))


def good_weight(x):
    """True for a sample weight the smoothers take: finite and >= 0 (NaN fails both tests)."""
    return x >= 0.0 and x < math.inf


def stream_weight(k, w0, c, per_stream):
    """The sample weight of stream ``k``: ``w0``, or with ``per_stream`` the stream's own
    ``c[k]`` times ``w0`` (the scale the sums are kept in: a power of two, exact), where a NaN,
    inf or negative ``c[k]`` counts as 0 (that stream's value is left out). The host refuses
    such weights before launching wherever it can look at them without a sync (the CPU); on a
    GPU this is the check, with no temporary and no launch of its own."""
    if not per_stream:
        return w0
    x = c[k]
    return x * w0 if good_weight(x) else 0.0


# ---------------------------------------------------------------- metric streams, one launch (Smoother)
# A stream's EMA keeps the pair (a, b) and its SMA the ring of W entries (``ring_v``, slot-major: entry
# ``slot * K + k``), the compensated sum (s, comp) and ``n``, the finite entries in the window. Pairs are
# interleaved (``ab[2k], ab[2k + 1]``), one 16-byte access on a GPU. Until the first ``sample_weight`` every
# weight is STREAM_SCALE: ``ring_v`` holds ``STREAM_SCALE * v`` for every value (a non-finite one stays
# non-finite: missing with ``skip``, else bad) and the weights' sum is ``n * STREAM_SCALE`` exactly, so
# nothing else is kept (:func:`streams_at`). The first weighted update widens that state in place
# (:func:`streams_widen_at`) to the weighted layout (:func:`streams_weighted_at`): ``ring_w`` (the entry's
# weight; 0 empty or missing, -1 bad), the pair (ws, wcomp) and ``bad``.


def streams_at(y, k, mode, d, ab, ring_v, sc, n, at, full, kind, parts, skip):
    """Stream ``k``'s EMA and SMA (``parts``), unweighted: value ``y[k]`` pushed into ring entry ``at``,
    evicting the entry there when ``full``. Every load comes first; the arithmetic is the weighted
    body's with every weight STREAM_SCALE, so the sums are the same bits."""
    v = metric_at(y, k, kind)
    a, b, s, comp, old, m = 0.0, 0.0, 0.0, 0.0, 0.0, 0
    if parts & EMA_PART:
        a, b = load_pair(ab, 2 * k)
    if parts & SMA_PART:
        old = ring_v[at]
        s, comp = load_pair(sc, 2 * k)
        m = n[k]
    finite = not (math.isnan(v) or math.isinf(v))
    if parts & EMA_PART:                   # stored either way: no branch before the loads
        a1, b1 = ema_step(a, b, v, STREAM_SCALE, d, mode)
        if finite or not skip:
            a, b = a1, b1
        store_pair(ab, 2 * k, a, b)
    if parts & SMA_PART:
        if full and old - old == 0.0:      # evict the oldest value (a finite one; else it was missing or bad)
            s, comp = neumaier(s, comp, -old)
            m -= 1
        x = STREAM_SCALE * v
        ring_v[at] = x
        if finite:
            s, comp = neumaier(s, comp, x)
            m += 1
        store_pair(sc, 2 * k, s, comp)
        n[k] = m


def streams_widen_at(k, size, ring_v, ring_w, wsc, n, bad, filled, skip):
    """Stream ``k``'s unweighted SMA state (:func:`streams_at`, ``size`` streams, ``filled`` ring slots
    holding an entry) as the weighted layout: exactly what :func:`streams_weighted_at` would have kept
    with every weight STREAM_SCALE."""
    m = n[k]
    for slot in range(filled):
        at = slot * size + k
        x = ring_v[at]
        if x - x == 0.0:
            ring_w[at] = STREAM_SCALE
        else:
            ring_v[at] = 0.0
            ring_w[at] = 0.0 if skip else -1.0
    store_pair(wsc, 2 * k, m * STREAM_SCALE, 0.0)
    bad[k] = 0 if skip else filled - m


def streams_weighted_at(y, k, w0, c, per_stream, mode, d, ab, ring_v, sc, n, ring_w, wsc, bad, at, kind, parts,
                        skip):
    """Stream ``k``'s EMA and SMA (``parts``) with sample weight ``stream_weight(k, ...)``: value ``y[k]``
    pushed into ring entry ``at``, evicting the one there. The window keeps compensated sums of ``w v``
    and ``w``; a non-finite value is missing (``skip``) or counted in ``bad`` so the mean reads NaN
    while it is in the window (propagate); a weight of 0 leaves the value out: of the EMA as a skipped
    value is (the pair as it was: no decay, no seed, a NaN of weight 0 no NaN), of the window's sums
    while its entry takes its place in the window."""
    v = metric_at(y, k, kind)
    w = stream_weight(k, w0, c, per_stream)
    a, b, s, comp, ws, wcomp, ov, ow, m, nb = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0
    if parts & EMA_PART:
        a, b = load_pair(ab, 2 * k)
    if parts & SMA_PART:
        ov, ow = ring_v[at], ring_w[at]
        s, comp = load_pair(sc, 2 * k)
        ws, wcomp = load_pair(wsc, 2 * k)
        m, nb = n[k], bad[k]
    finite = not (math.isnan(v) or math.isinf(v))
    if parts & EMA_PART:
        a1, b1 = ema_step(a, b, v, w, d, mode)
        if w != 0.0 and (finite or not skip):
            a, b = a1, b1
        store_pair(ab, 2 * k, a, b)
    if parts & SMA_PART:
        if ow > 0.0:                           # evict the oldest value
            s, comp = neumaier(s, comp, -ov)
            ws, wcomp = neumaier(ws, wcomp, -ow)
            m -= 1
        elif ow < 0.0:                         # a non-finite entry leaves the window
            nb -= 1
        if not finite or w == 0.0:
            ring_v[at] = 0.0
            ring_w[at] = 0.0 if (skip or w == 0.0) else -1.0
            if not skip and w != 0.0:
                nb += 1
        else:
            ring_v[at] = w * v
            ring_w[at] = w
            s, comp = neumaier(s, comp, w * v)
            ws, wcomp = neumaier(ws, wcomp, w)
            m += 1
        store_pair(sc, 2 * k, s, comp)
        store_pair(wsc, 2 * k, ws, wcomp)
        n[k], bad[k] = m, nb
