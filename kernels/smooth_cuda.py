"""CUDA twins of :mod:`fastema.kernels.smooth_cpu` (grid-stride over streams)."""
import functools
import math

import numpy as np
from numba import cuda

from . import _bits, _smooth
from ._smooth import F64
from ._cuda_hw import as_float

_device = functools.partial(cuda.jit, device=True, inline="always")
decode = _device(_bits.decode)
ema_step = _device(_smooth.ema_step)
neumaier = _device(_smooth.neumaier)


@functools.cache
def ema_kernel(kind, mode, skip):
    K, M, SKIP = kind, mode, skip

    def kernel(y, w0, c, per_stream, a, b, d):
        count = y.size
        for k in range(cuda.grid(1), count, cuda.gridsize(1)):
            v = y[k] if K == F64 else np.float64(as_float(decode(y[k], K)))
            w = c[k] if per_stream else w0
            if SKIP and (math.isnan(v) or math.isinf(v)):
                continue
            a[k], b[k] = ema_step(a[k], b[k], v, w, d, M)

    return cuda.jit(kernel)


@functools.cache
def sma_kernel(kind, skip):
    K, SKIP = kind, skip

    def kernel(y, w0, c, per_stream, ring_v, ring_w, s, comp, ws, wcomp, n, bad, slot):
        count = y.size
        base = slot * count
        for k in range(cuda.grid(1), count, cuda.gridsize(1)):
            ov, ow = ring_v[base + k], ring_w[base + k]
            if ow > 0.0:
                s[k], comp[k] = neumaier(s[k], comp[k], -ov)
                ws[k], wcomp[k] = neumaier(ws[k], wcomp[k], -ow)
                n[k] -= 1
            elif ow < 0.0:
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

    return cuda.jit(kernel)
