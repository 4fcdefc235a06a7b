"""CPU kernels of the metric smoothers: one pass over K streams (parallel for large K).

Arguments (1-D, C-contiguous):
    y:       K values: float64, or the uint32/uint16 bits of float32/bfloat16/float16 (``kind``).
    w0, c, per_stream: the update's sample weight (count): the float ``w0``, or ``c[k]`` per
             stream (float64[K]) when ``per_stream``.
    EMA: a, b float64[K] state. SMA: ring_v, ring_w float64[W * K] (slot-major),
    s, comp, ws, wcomp float64[K] compensated sums of values and weights, n, bad int64[K]
    (valid and non-finite entries in the window), ``slot`` the ring position to overwrite.
"""
import functools
import math

import numpy as np
from numba import njit, prange

from . import _bits, _smooth
from ._smooth import F64

_scalar = functools.partial(njit, inline="always", cache=True)
decode = _scalar(_bits.decode)
ema_step = _scalar(_smooth.ema_step)
neumaier = _scalar(_smooth.neumaier)
from ._cpu_hw import as_float  # noqa: E402


@functools.cache
def ema_kernel(kind, mode, skip, parallel):
    """EMA update of K streams; ``skip``: non-finite values leave their stream untouched."""
    K, M, SKIP = kind, mode, skip

    def kernel(y, w0, c, per_stream, a, b, d):
        count = y.size
        for k in prange(count):
            v = y[k] if K == F64 else np.float64(as_float(decode(y[k], K)))
            w = c[k] if per_stream else w0
            if SKIP and (math.isnan(v) or math.isinf(v)):
                continue
            a[k], b[k] = ema_step(a[k], b[k], v, w, d, M)

    return njit(parallel=parallel, cache=True)(kernel)


@functools.cache
def sma_kernel(kind, skip, parallel):
    """Push one value per stream into a window of W slots, evicting slot ``slot``.

    Non-finite values are missing (``skip``) or counted in ``bad`` so the mean reads NaN
    while they are in the window (propagate).
    """
    K, SKIP = kind, skip

    def kernel(y, w0, c, per_stream, ring_v, ring_w, s, comp, ws, wcomp, n, bad, slot):
        count = y.size
        base = slot * count
        for k in prange(count):
            ov, ow = ring_v[base + k], ring_w[base + k]
            if ow > 0.0:                           # evict the oldest value
                s[k], comp[k] = neumaier(s[k], comp[k], -ov)
                ws[k], wcomp[k] = neumaier(ws[k], wcomp[k], -ow)
                n[k] -= 1
            elif ow < 0.0:                         # a non-finite entry leaves the window
                bad[k] -= 1
            v = y[k] if K == F64 else np.float64(as_float(decode(y[k], K)))
            w = c[k] if per_stream else w0
            if math.isnan(v) or math.isinf(v) or w == 0.0:
                ring_v[base + k] = 0.0
                ring_w[base + k] = 0.0 if (SKIP or w == 0.0) else -1.0
                if not SKIP and w != 0.0:
                    bad[k] += 1
            else:
                ring_v[base + k] = w * v
                ring_w[base + k] = w
                s[k], comp[k] = neumaier(s[k], comp[k], w * v)
                ws[k], wcomp[k] = neumaier(ws[k], wcomp[k], w)
                n[k] += 1

    return njit(parallel=parallel, cache=True)(kernel)
