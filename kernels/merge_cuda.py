"""CUDA twin of :mod:`.merge_cpu` (numba-cuda): the weighted sum of K inputs, with the same element
bodies (:mod:`._merge`), so a merge on a GPU gives the CPU's bits.

:func:`merge_kernel` takes :func:`.merge_cpu.merge_kernel`'s arguments but ``chunk``:
``(n, out_addr, acc_addr, in_addr, weights, start, finish, key, first)``, every address device
memory of the launching context (``in_addr`` and ``weights`` device arrays). Each thread sums its
elements over the K inputs in order in a register (grid-stride, so any launch size is correct)
and stores the result once. Imported only when a CUDA buffer arrives.
"""
import functools

import numpy as np
from numba import cuda

from . import _merge
from ._cache import cached_cuda
from ._cuda_hw import SIMULATOR
from .cuda import _DEPENDENCIES, _pointer
from .cuda import E as _E
from .kinds import F32, F64

M = _merge.bind(functools.partial(cuda.jit, device=True, inline="always"), _E)
DEPENDENCIES = _DEPENDENCIES + (_merge,)
"""The modules this file's kernels depend on besides itself (the disk cache's stamp)."""


def _jit(fn):
    from . import cuda as ema_cuda

    kernel = cuda.jit(fn)
    return cached_cuda(kernel, DEPENDENCIES) if ema_cuda.CACHE and not SIMULATOR else kernel


@functools.cache
def merge_kernel(in_kind, out_kind, wide, stochastic):
    """See :func:`.merge_cpu.merge_kernel` (one thread per element, grid-stride)."""
    WIDE = wide or in_kind == F64 or out_kind == F64
    XK, QK, SR = in_kind, out_kind, stochastic
    xptr, qptr, aptr = _pointer(XK), _pointer(QK), _pointer(F64 if WIDE else F32)
    term = M.merge_term_wide if WIDE else M.merge_term
    store_wide, bits = M.merge_store_wide, M.merge_bits
    as_float, as_bits = _E.as_float, _E.as_bits

    def kernel(n, out_addr, acc_addr, in_addr, weights, start, finish, key, first):
        a = aptr(acc_addr, n)
        q = qptr(out_addr, n)
        for j in range(cuda.grid(1), n, cuda.gridsize(1)):
            if WIDE:
                acc = np.float64(0.0) if start else a[j]
            else:
                acc = np.float32(0.0) if start else as_float(a[j])
            for i in range(in_addr.size):
                acc = term(acc, xptr(in_addr[i], n), j, weights[i], XK)
            if not finish:
                if WIDE:
                    a[j] = acc
                else:
                    a[j] = as_bits(acc)
            elif WIDE:
                store_wide(q, j, acc, QK, SR, key, first + j)
            else:
                q[j] = bits(acc, QK, SR, key, first + j)

    return _jit(kernel)
